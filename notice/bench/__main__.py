"""`python -m notice.bench` (`make bench`): see notice.bench.cli."""

from notice.bench.cli import main

main()
