"""TEST-ONLY: put this folder on PYTHONPATH (with FTALK_TEST_GLOO=1) so that processes started by
`accelerate launch` apply the gloo patch before accelerate picks a backend."""

import os

if os.environ.get("FTALK_TEST_GLOO") == "1":
    from tests.dist import gloo_patch

    gloo_patch.apply()
