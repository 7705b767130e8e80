from sparsevl.classify.cli import main
from sparsevl.runtime import tune_cpu_allocator

tune_cpu_allocator()
raise SystemExit(main())
