"""The MLflow model's code (MLflow "models from code"): this file is copied into every logged agent model and
run by `mlflow.pyfunc.load_model` / `mlflow models serve`. Nothing is pickled: the model is this class,
imported from the installed project, and the weights are the verified artifact in the model's artifacts.
"""

from mlflow.models import set_model

from flows.serving import ForgeAgentModel

set_model(ForgeAgentModel())
