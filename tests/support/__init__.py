"""Test-only helpers, imported as `support` (pyproject's pytest `pythonpath` puts tests/ on sys.path).

The services that benches and examples share with the tests live in the package, `lazybuild.testing`;
what only the tests need lives here: the evil and fault-injecting registry parts (`registry`),
containerd and the snapshotter (`containerd`), the canary tree (`canary`), the input tars (`tarcases`),
layer listings (`listing`), image flattening (`flatten`) and the console script (`cli_runner`).
"""

import os

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(TESTS)
# ../shared beside the checkout, or where LAZYBUILD_SHARED says: the reference tools and test data.
SHARED = os.environ.get("LAZYBUILD_SHARED", os.path.join(REPO, "..", "shared"))
# The Dockerfile corpus both back ends are checked on (tests/data/frontend_corpus).
CORPUS = os.path.join(TESTS, "data", "frontend_corpus")
