import warnings

warnings.filterwarnings("ignore", message=".*compiled extension.*")
