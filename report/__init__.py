"""The report card (report/card.py): every stage's figures and plots in one page, REPORT.md; on top of every layer."""
