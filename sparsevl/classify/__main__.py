from sparsevl.classify.cli import main

raise SystemExit(main())
