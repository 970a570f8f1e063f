import os

import pytest

# Keep the suite off the user's real data caches: tests see only what is in the repo (and tmp_path).
os.environ.pop("DLCOMPARE_DATA_DIR", None)


@pytest.fixture
def results_dir(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    return d
