"""Reports: storage (what a teacher cache costs), gates (student expert-load heat maps, the paper's
Figure 10) and results (Rouge-L tables and charts in one CSV schema); `moedistill report KIND` dispatches
to them from pipeline/cli.py."""
