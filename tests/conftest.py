import os
import warnings

warnings.filterwarnings("ignore", message=".*compiled extension.*")
# a tracer rule that raises is a bug: fail the test instead of degrading to an unmapped-op warning
os.environ["FASTPRUNE_STRICT_TRACE"] = "1"
