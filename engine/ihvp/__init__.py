"""Inverse-Hessian-vector products behind one interface (:class:`Solver`)."""

from .base import Solver
from .cg import BlockCG
from .exact import ExactSolver
from .hessian import data_hessian, full_hessian, linear_hessian
from .hvp import batch_hvp, dense_hessian, full_hvp
from .lissa import Lissa, largest_eigenvalue
from .projected import ProjectedSolver, projected_curvature

__all__ = [
           "BlockCG",
           "ExactSolver",
           "Lissa",
           "ProjectedSolver",
           "Solver",
           "batch_hvp",
           "data_hessian",
           "dense_hessian",
           "full_hessian",
           "full_hvp",
           "largest_eigenvalue",
           "linear_hessian",
           "projected_curvature",
]
