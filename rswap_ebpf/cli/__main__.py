import sys

from rswap_ebpf.cli.main import main

sys.exit(main())
