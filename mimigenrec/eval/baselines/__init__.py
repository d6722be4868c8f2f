"""Classic baselines scored on the same rows and metrics as the LLM: popularity and SASRec."""
from mimigenrec.eval.baselines.popularity import Popularity
from mimigenrec.eval.baselines.sasrec import SASRec, SASRecConfig, SASRecScorer

BASELINES = ("popularity", "sasrec")

__all__ = ["BASELINES", "Popularity", "SASRec", "SASRecConfig", "SASRecScorer"]
