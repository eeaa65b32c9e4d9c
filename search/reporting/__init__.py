"""What people look at: the EDA figures, the figure helpers, the progress lines and top-trials
table, the search report (HTML and trials.csv) and the model card."""
