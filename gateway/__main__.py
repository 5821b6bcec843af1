"""`python -m gateway` runs the same CLI as the `inference-gateway` script."""

from gateway.cli import main

raise SystemExit(main())
