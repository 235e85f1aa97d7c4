"""Where the shipped profile data lives inside the package."""
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
VIDUR = DATA / "vidur"
OPERATORS_CSV = DATA / "operators.csv.gz"
NETWORK_CSV = DATA / "network.csv.gz"
#: Folder whose *.csv / *.csv.gz files ProfileDB.load() reads after the shipped data.
MEASURED_DIR = DATA / "measured"
CALIBRATION_CSV = DATA / "calibration" / "splitwise_a100_perf.csv"
