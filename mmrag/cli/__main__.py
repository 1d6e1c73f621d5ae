"""``python -m mmrag.cli``: the same commands as the ``mmrag`` script."""

from mmrag.cli import main

main()
