"""An ensemble module: averages the probabilities several models gave one item."""

import tessera


class Vote(tessera.Task):
    def vote(self, predictions):
        n = len(predictions[0]["proba"])
        mean = [sum(p["proba"][k] for p in predictions) / len(predictions) for k in range(n)]
        label = max(range(n), key=mean.__getitem__)
        votes = {p["model"]: max(range(n), key=p["proba"].__getitem__) for p in predictions}
        return {"label": label, "y": predictions[0]["y"], "votes": votes}
