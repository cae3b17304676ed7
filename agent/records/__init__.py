"""Records: the ledger of experiments and the state a resume reads."""
