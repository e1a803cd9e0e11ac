"""saetune.app: the Streamlit explorer (``saetune explore RUN_DIR``).

``explorer.py`` is the home page and ``pages/*.py`` the other pages; each is a standalone
Streamlit script with absolute imports that reads the run dir from ``SAETUNE_RUN_DIR``.
Rendering lives in :mod:`saetune.analysis`; page helpers in ``_common.py``.
"""

if __name__ != "saetune.app":  # found as a top-level `app` from a checkout root: see saetune/_checkout.py
    from saetune._checkout import hand_over

    hand_over(__name__, __file__)
else:
    from saetune.app._launch import ENV, HOME, explore, streamlit_command

    __all__ = ["ENV", "HOME", "explore", "streamlit_command"]
