from sparsevl.cli import main

raise SystemExit(main())
