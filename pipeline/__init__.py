"""The Ray and MLflow shell: data stages on Ray Data, training on Ray Train, search on Ray Tune,
runs and registered models in MLflow. Every stage is ``python -m pipeline <stage>``."""
