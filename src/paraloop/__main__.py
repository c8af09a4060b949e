from paraloop.cli import main

raise SystemExit(main())
