import pytest


@pytest.fixture(scope="session")
def toy_base():
    """``(model, tokenizer)`` of the shipped toy model, loaded once for the whole suite (eval mode)."""
    from saetune.toy import load_toy

    model, tokenizer = load_toy()
    return model.eval(), tokenizer
