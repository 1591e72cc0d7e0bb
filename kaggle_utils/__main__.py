from kaggle_utils.cli import main

raise SystemExit(main())
