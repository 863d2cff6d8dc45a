from monitor.main import main

raise SystemExit(main())
