"""The R1 pipeline: stages under Hydra, a run manifest, resumable runs and reports."""
