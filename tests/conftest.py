"""Settings every test module shares; shared helpers live in the modules next to this one
(`workflow_helpers`, `toy_adapters`, `planted_tables`, `http_fixtures`, `tiny_inpainting`), and no test
module imports another."""

from __future__ import annotations

import os

# Nothing is downloaded in tests, however they are started (`make test` sets it too): a model that is
# not on disk fails in seconds with a message instead of waiting on the network.
os.environ["HF_HUB_OFFLINE"] = "1"
