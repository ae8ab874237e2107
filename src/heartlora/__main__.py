from heartlora.cli.main import main

raise SystemExit(main())
