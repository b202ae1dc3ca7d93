"""The champion's model code, as MLflow logs it ("models from code": no pickled object).

:func:`tasks.evaluation.promotion.log_pyfunc_model` passes THIS FILE's path as
``python_model``; MLflow copies it beside the model and runs it at load time, with the
logged ``tasks``/``models`` packages on ``sys.path``. Nothing imports it.
"""

import mlflow

from tasks.evaluation.pyfunc import SlimflowClassifier

mlflow.models.set_model(SlimflowClassifier())
