from reglue.cli import main

raise SystemExit(main())
