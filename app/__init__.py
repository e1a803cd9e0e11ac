"""saetune.app: the Streamlit explorer. Not built yet."""
