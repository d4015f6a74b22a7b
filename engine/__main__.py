"""`python -m pagedserve.engine generate ...`"""

from pagedserve.engine.cli import main

raise SystemExit(main())
