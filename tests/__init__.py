from pathlib import Path

# The shared fixtures sit next to the repository (present in CI, absent in a user's clone).
FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
