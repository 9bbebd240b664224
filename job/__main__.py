import sys

from job.runner import main

sys.exit(main())
