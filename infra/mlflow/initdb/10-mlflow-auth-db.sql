-- Run once by the postgres image on an empty data volume, as POSTGRES_USER (mlflow):
-- a second database for MLflow's basic-auth users and permissions, apart from the tracking data.
CREATE DATABASE mlflow_auth;
