"""`python -m pagedserve.engine generate ...`"""

from .cli import main

raise SystemExit(main())
