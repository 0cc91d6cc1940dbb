"""The MLflow model as code ("models from code"): MLflow runs this file to build the model, so
nothing is unpickled when the model loads. See bp_service.serving.model.BPServiceModel."""

from mlflow.models import set_model

from bp_service.serving.model import BPServiceModel

set_model(BPServiceModel())
