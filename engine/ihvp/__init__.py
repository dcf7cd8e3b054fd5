"""Inverse-Hessian-vector products behind one interface (:class:`Solver`)."""

from .base import Solution, Solver
from .cg import BlockCG
from .ekfac import EKFACFactors, factors_from_tensors, factors_to_tensors, fit_ekfac
from .ekfac_solver import EKFACSolver
from .exact import ExactSolver
from .fisher import FisherSolver
from .hessian import data_hessian, full_hessian, linear_hessian
from .hvp import batch_hvp, dense_hessian, full_hvp
from .lissa import Lissa, largest_eigenvalue
from .projected import ProjectedSolver, projected_curvature

__all__ = [
    "BlockCG",
    "EKFACFactors",
    "EKFACSolver",
    "ExactSolver",
    "FisherSolver",
    "Lissa",
    "ProjectedSolver",
    "Solution",
    "Solver",
    "batch_hvp",
    "data_hessian",
    "dense_hessian",
    "factors_from_tensors",
    "factors_to_tensors",
    "fit_ekfac",
    "full_hessian",
    "full_hvp",
    "largest_eigenvalue",
    "linear_hessian",
    "projected_curvature",
]
