"""Is a store what its manifest says: the quick and checksum checks every read and build runs
(checks.py), and the full verify behind `moedistill cache verify` (verify.py)."""
