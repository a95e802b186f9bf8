"""The 17 lung-cancer-screening tasks of M3FM, asked as questions.

Each task names its answer candidates (from the paper's Fig. 3a), the CT
region it looks at (which fixes the image scale), its loss kind and the
predictor ("head") it answers through. Tasks with the same answer space share
one head, as the paper allows ("shared Predictors for the same output
dimension, such as Yes or No answers"). Two auxiliary clinical
information-retrieval tasks train the text pathway on clinical text alone.

Regions:
  lung_slab   16 axial slices of one lung (nodule tasks; attention restricted
              to the lung box)
  each_lung   left and right lung separately; the patient's score is the max
              over the two lungs (paper, Methods)
  heart       box around the heart (CVD tasks)
  both_lungs  box around both lungs (other chest findings, COVID-19)
  none        no image (Lung-RADS from report text, clinical retrieval)

Loss kinds:
  ce      softmax cross-entropy over the answer candidates
  hazard  cumulative hazard over years 1..6, censoring-masked sigmoid BCE
  digits  3-digit number as three 10-way classifications (public M3FM code)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

YES_NO = ("Yes", "No")
HAZARD_YEARS = 6
RISK_ANSWERS = tuple(f"risk within {y} year{'s' if y > 1 else ''}" for y in range(1, HAZARD_YEARS + 1))


class HUWindow(NamedTuple):
    """The HU range a task reads and how it becomes the model's input (m3fm/data/crops.py normalize_hu).

    encoding "signed": lo..hi onto -1..1, as the public code does.
    encoding "below": hi..lo onto 0..1, i.e. how far a voxel lies below hi; everything at or above hi is 0.
    """

    lo: float
    hi: float
    encoding: str = "signed"


# HU windows of the public configs: lungs and chest (cancer risk), heart (CVD)
LUNG_WINDOW = HUWindow(-1300.0, 150.0)
HEART_WINDOW = HUWindow(-135.0, 225.0)
# Emphysema is low-attenuation lung: the classical index is the fraction of lung voxels under -950 HU (LAA-950), a
# per-voxel threshold. The CTViT's patch embedding is linear, so in the wide lung window it sees a patch's sparse
# dark voxels only through the patch's mean, which other tissue swamps: on the issue-14 cohort, logistic regression
# on the tiny scale's patch means separates emphysema with AUC 0.77 in the lung window and 1.00 in this one, whose
# clip at -900 HU is the threshold (benchmarks/windows.py). The same input, one window per task, as the heart has.
# Encoded "below": nearly every voxel of a chest (tissue, normal lung) lies above -900 HU. Scaled onto -1..1 they
# were all +1, so every patch embedding was one large constant vector and the few holes a small change of it; a site
# alone (42-57 training exams) then fitted its own patients instead (train AUC 1.00, test 0.49), and so did FedAvg
# over two such sites (test 0.50 / 0.42), while pooling them found the holes. With the clipped tissue at 0 the holes
# are the whole input: the same site alone reaches test AUC 1.00, federated 1.00 / 0.96 (issue 14, docs/learning.md).
LOW_ATTENUATION_WINDOW = HUWindow(-1000.0, -900.0, "below")

# region -> image scale name in the model configuration (m3fm/model/configs.py)
REGION_SCALE = {
    "lung_slab": "nodule",
    "each_lung": "lung",
    "heart": "heart",
    "both_lungs": "chest",
    "none": None,
}


@dataclass(frozen=True)
class Task:
    name: str
    group: str
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    region: str
    loss: str
    head: str
    text: str = "clinical"  # what fills the text slot: the clinical record, or the radiology "report"
    hu_window: HUWindow | None = LUNG_WINDOW
    auxiliary: bool = False

    @property
    def scale(self) -> str | None:
        return REGION_SCALE[self.region]

    @property
    def num_outputs(self) -> int:
        if self.loss == "hazard":
            return HAZARD_YEARS + 1  # six yearly hazards plus a base hazard
        if self.loss == "digits":
            return 30  # three digits x ten classes
        return len(self.answers)


def _yes_no(name: str, questions: tuple[str, ...], region: str = "both_lungs", group: str = "chest_abnormality",
            hu_window: HUWindow | None = None) -> Task:
    return Task(name, group, questions, YES_NO, region, "ce", "yes_no",
                hu_window=hu_window or (HEART_WINDOW if region == "heart" else LUNG_WINDOW))


TASKS: tuple[Task, ...] = (
    _yes_no("nodule_presence", (
        "Is there any lung nodule?",
        "Does this lung contain a nodule?",
        "Are there any pulmonary nodules present?",
        "Can a lung nodule be seen in this region?",
        "Is a nodule visible in the lung?",
        "Does the CT show any nodule in this lung?",
    ), region="lung_slab", group="nodule"),
    Task("nodule_location", "nodule", (
        "Where is the lung nodule?",
        "In which lobe is the nodule located?",
        "Which lobe contains the lung nodule?",
        "What is the location of the nodule?",
        "Identify the lobe where the nodule lies.",
        "In which part of the lung is the nodule found?",
    ), ("Right upper lobe", "Right middle lobe", "Right lower lobe", "Left upper lobe", "Left lower lobe"),
        "lung_slab", "ce", "nodule_location"),
    Task("nodule_attenuation", "nodule", (
        "What is the attenuation of the nodule?",
        "Is the nodule solid or ground glass?",
        "Describe the attenuation of the lung nodule.",
        "What is the density type of the nodule?",
        "Classify the nodule attenuation.",
        "What kind of attenuation does the nodule show?",
    ), ("Solid", "Ground glass", "Others (part-solid, fluid/water, fat, undetermined)"),
        "lung_slab", "ce", "nodule_attenuation"),
    Task("nodule_margin", "nodule", (
        "What is the type of nodule margin?",
        "How would you describe the margin of the nodule?",
        "Is the nodule margin smooth or spiculated?",
        "What does the border of the nodule look like?",
        "Classify the margin of the lung nodule.",
        "What is the margin of the nodule?",
    ), ("Spiculated (stellate)", "Smooth", "Poorly defined", "Unable to determine"),
        "lung_slab", "ce", "nodule_margin"),
    Task("nodule_size", "nodule", (
        "What is the size of the nodule?",
        "How large is the lung nodule?",
        "What is the diameter of the nodule?",
        "Estimate the size of the nodule.",
        "Which size range does the nodule fall in?",
        "How big is the nodule in millimeters?",
    ), ("<=4 mm", "4-6 mm", "6-8 mm", "8-15 mm", "15-30 mm", ">30 mm"),
        "lung_slab", "ce", "nodule_size"),
    _yes_no("cvd_diagnosis", (
        "Is there significant cardiovascular abnormality?",
        "Is there any significant cardiovascular abnormality?",
        "Are there discernible cardiovascular defects present?",
        "Does the patient have cardiovascular disease?",
        "Is cardiovascular disease present on this scan?",
        "Does the heart show a significant abnormality?",
    ), region="heart", group="cvd"),
    Task("cvd_mortality", "cvd", (
        "Predict the risk of cardiovascular disease mortality.",
        "How high is the mortality risk from cardiovascular disease?",
        "What is the risk of dying from cardiovascular disease?",
        "Estimate the cardiovascular mortality risk over six years.",
        "Predict cardiovascular death risk for this patient.",
        "What is the patient's risk of cardiovascular death?",
    ), RISK_ANSWERS, "heart", "hazard", "cvd_mortality", hu_window=HEART_WINDOW),
    Task("lung_cancer_risk", "cancer_risk", (
        "Predict the lung cancer risk over six years.",
        "Predict the lung cancer risk over 6 years.",
        "What is the risk of lung cancer in the next six years?",
        "Estimate this patient's lung cancer risk from year one to year six.",
        "How likely is lung cancer within six years?",
        "What is the probability of developing lung cancer over the next 6 years?",
    ), RISK_ANSWERS, "each_lung", "hazard", "lung_cancer_risk"),
    _yes_no("atelectasis", (
        "Is there atelectasis?",
        "Does the scan show atelectasis?",
        "Is any lung collapse or atelectasis present?",
        "Can atelectasis be seen?",
        "Is there evidence of atelectasis?",
        "Are the lungs partially collapsed?",
    )),
    _yes_no("pleural_thickening_effusion", (
        "Is there pleural thickening/effusion?",
        "Is there pleural thickening or pleural effusion?",
        "Does the scan show fluid in the pleural space?",
        "Can pleural thickening or effusion be seen?",
        "Is a pleural effusion present?",
        "Is there any abnormality of the pleura?",
    )),
    _yes_no("hilar_mediastinal_mass", (
        "Is there hilar/mediastinal adenopathy/mass?",
        "Is there a hilar or mediastinal mass?",
        "Are enlarged hilar or mediastinal lymph nodes present?",
        "Does the mediastinum contain a mass?",
        "Is there mediastinal adenopathy?",
        "Can a hilar mass be seen?",
    )),
    _yes_no("chest_wall_abnormality", (
        "Is there chest wall abnormality?",
        "Is there any abnormality of the chest wall?",
        "Does the chest wall show bone destruction or a lesion?",
        "Is a chest wall lesion present?",
        "Are there abnormal findings in the chest wall?",
        "Is there a rib or chest wall abnormality?",
    )),
    _yes_no("consolidation", (
        "Is there consolidation?",
        "Does the scan show lung consolidation?",
        "Is any airspace consolidation present?",
        "Can consolidation be seen in the lungs?",
        "Is there evidence of pulmonary consolidation?",
        "Are there consolidated areas in the lungs?",
    )),
    _yes_no("emphysema", (
        "Is there emphysema?",
        "Does the scan show emphysema?",
        "Is emphysema present in the lungs?",
        "Can emphysematous changes be seen?",
        "Is there evidence of emphysema?",
        "Are there signs of emphysema?",
    ), hu_window=LOW_ATTENUATION_WINDOW),
    _yes_no("reticular_fibrosis_scar", (
        "Is there any reticular/reticulonodular opacities/honeycombing/fibrosis/scar?",
        "Is there fibrosis or scarring in the lungs?",
        "Are reticular opacities or honeycombing present?",
        "Does the scan show lung fibrosis?",
        "Is there a reticulonodular pattern or scar?",
        "Can honeycombing or fibrotic change be seen?",
    )),
    _yes_no("covid19", (
        "Predict if the patient has COVID-19 given the data.",
        "Does the patient have COVID-19?",
        "Is this scan consistent with COVID-19 infection?",
        "Is the patient positive for COVID-19?",
        "Are there findings of COVID-19 pneumonia?",
        "Does the patient have coronavirus disease 2019?",
    ), group="covid"),
    Task("lung_rads", "lung_rads", (
        "What is the Lung-RADS?",
        "What is the Lung-RADS category?",
        "Which Lung-RADS category fits this report?",
        "Assign the Lung-RADS category from the report.",
        "What Lung-RADS score does this report indicate?",
        "Classify this report into a Lung-RADS category.",
    ), ("1", "2", "3", "4"), "none", "ce", "lung_rads", text="report", hu_window=None),
)

# Auxiliary clinical information retrieval (paper Fig. 1e, questions 17 and 18):
# text-only questions whose answers are read from the clinical record. `{}`
# is filled by the dataset with a disease name or a numeric field.
AUXILIARY_TASKS: tuple[Task, ...] = (
    Task("clinical_history", "clinical", (
        "Was the patient diagnosed with {}?",
        "Does the patient have a history of {}?",
        "Has the patient ever had {}?",
        "Is {} in the patient's disease history?",
        "Was {} ever diagnosed in this patient?",
    ), YES_NO, "none", "ce", "yes_no", hu_window=None, auxiliary=True),
    Task("clinical_number", "clinical", (
        "How old is the patient?",
        "What is the patient's age?",
        "How many pack years did the patient smoke?",
        "How many cigarettes per day does the patient smoke?",
        "What is the patient's weight in pounds?",
        "What is the patient's height in inches?",
    ), tuple(str(d) for d in range(10)), "none", "digits", "clinical_number", hu_window=None, auxiliary=True),
)

ALL_TASKS: tuple[Task, ...] = TASKS + AUXILIARY_TASKS
# the tasks a short run is judged on, every task group's main question (benchmarks/learning.py, the demo run)
HEADLINE_TASKS = ("nodule_presence", "emphysema", "consolidation", "cvd_diagnosis", "covid19", "lung_rads",
                  "lung_cancer_risk")
TASK_BY_NAME: dict[str, Task] = {t.name: t for t in ALL_TASKS}
TASK_INDEX: dict[str, int] = {t.name: i for i, t in enumerate(ALL_TASKS)}


def get_task(name: str) -> Task:
    try:
        return TASK_BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASK_BY_NAME)}") from None


def head_outputs() -> dict[str, int]:
    """Output size of every predictor head; tasks that share a head must agree on it."""
    sizes: dict[str, int] = {}
    for task in ALL_TASKS:
        if sizes.setdefault(task.head, task.num_outputs) != task.num_outputs:
            raise ValueError(f"tasks sharing head {task.head!r} disagree on its output size")
    return sizes

