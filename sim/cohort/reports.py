"""Free-text radiology reports consistent with the image, and Lung-RADS from the nodule they describe.

The report states the nodule's size, attenuation, margin and lobe but not the
Lung-RADS category, so the category has to be derived from the description
(the paper's Lung-RADS task reads reports). Categories follow Lung-RADS v1.1
for baseline screens, with 4A/4B/4X reported as 4.
"""

from __future__ import annotations

import numpy as np

from sim.cohort.patients import ExamFindings, Nodule

ATTENUATION_WORDS = {"solid": "solid", "ground_glass": "ground-glass", "part_solid": "part-solid"}
MARGIN_WORDS = {"smooth": "smooth margins", "spiculated": "spiculated margins",
                "poorly_defined": "poorly defined margins", "unable": "margins that cannot be assessed"}


def lung_rads(nodule: Nodule | None) -> str:
    if nodule is None:
        return "1"
    d = nodule.diameter_mm
    if nodule.attenuation == "ground_glass":
        return "2" if d < 30 else "3"
    if nodule.attenuation == "part_solid":
        if d < 6:
            return "2"
        return "3" if nodule.solid_mm < 6 else "4"
    if d < 6:
        return "2"
    return "3" if d < 8 else "4"


def report_text(f: ExamFindings, rng: np.random.Generator) -> str:
    lungs = []
    if f.nodule is not None:
        n = f.nodule
        extra = f" with a {n.solid_mm:.0f} mm solid component" if n.attenuation == "part_solid" else ""
        lungs.append(f"There is a {n.diameter_mm:.0f} mm {ATTENUATION_WORDS[n.attenuation]} nodule{extra} in the "
                     f"{n.lobe.lower()} with {MARGIN_WORDS[n.margin]}.")
    else:
        lungs.append(str(rng.choice(["No suspicious pulmonary nodules.", "No pulmonary nodules are identified."])))
    if f.emphysema > 0:
        lungs.append(("Severe" if f.emphysema > 0.18 else "Mild") + " centrilobular emphysema, upper lobe predominant.")
    if f.consolidation:
        lungs.append("Focal consolidation with air bronchograms.")
    if f.atelectasis:
        lungs.append("Linear subsegmental atelectasis at the lung base.")
    if f.fibrosis:
        lungs.append("Subpleural reticular opacities at the bases, consistent with fibrosis.")
    if f.covid:
        lungs.append("Multifocal peripheral ground-glass opacities, a pattern reported with COVID-19 pneumonia.")
    pleura = "Pleural effusion or thickening is present." if f.pleural else "No pleural effusion."
    mediastinum = "Hilar soft-tissue mass." if f.hilar_mass else "No hilar or mediastinal adenopathy."
    heart = ("Cardiomegaly. " if f.cardiomegaly else "Normal heart size. ") + (
        "Coronary artery calcification." if f.cac_spots >= 3 else "No significant coronary calcification.")
    wall = "Soft-tissue mass of the chest wall with rib destruction." if f.chest_wall else "Chest wall is unremarkable."
    return (f"EXAMINATION: Low-dose CT chest for lung cancer screening.\n"
            f"FINDINGS:\nLungs: {' '.join(lungs)}\nPleura: {pleura}\nMediastinum: {mediastinum}\n"
            f"Heart: {heart}\nChest wall: {wall}\n")
