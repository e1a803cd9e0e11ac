"""saetune.analysis: notebook-friendly analysis (pandas DataFrames, plotly figures). Not built yet."""
