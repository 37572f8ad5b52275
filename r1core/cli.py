"""`r1core` console entry point (placeholder until the pipeline lands)."""


def main() -> None:
    raise SystemExit("r1core run: pipeline not built yet")
