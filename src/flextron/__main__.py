from flextron.cli import main

raise SystemExit(main())
