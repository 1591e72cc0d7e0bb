"""`python -m kaggle_utils`: the Hugging Face libraries are told to stay offline before any of them is
imported (`environment.use_offline_hub`; a variable the user set is kept), then the CLI runs."""

from kaggle_utils.core.environment import use_offline_hub

use_offline_hub()

from kaggle_utils.cli.main import main  # noqa: E402 - after the offline switches, which the hub reads at import

raise SystemExit(main())
