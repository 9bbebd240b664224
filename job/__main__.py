import sys

from job.service.entry import main

sys.exit(main())
