"""modelql: a local transformer model, served and queried like a database."""
__version__ = "0.1.0"
