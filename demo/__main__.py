from pagedserve.demo.model import main

raise SystemExit(main())
