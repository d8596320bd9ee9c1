"""The field's algorithms beyond the core recipes, one file each.

Each file holds one algorithm's parts (a Clipper, a TokenFilter, an ImportanceWeighter or an
AdvantageEstimator, built on the public role bases) and, when it is a whole algorithm, its recipe
function; :data:`gspo_components.RECIPES` lists the recipes.
"""
