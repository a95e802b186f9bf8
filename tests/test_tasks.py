from collections import Counter

from m3fm.tasks import ALL_TASKS, AUXILIARY_TASKS, REGION_SCALE, TASKS, head_outputs, get_task


def test_seventeen_tasks_in_the_papers_groups():
    assert len(TASKS) == 17
    assert Counter(t.group for t in TASKS) == {
        "nodule": 5, "cvd": 2, "cancer_risk": 1, "chest_abnormality": 7, "covid": 1, "lung_rads": 1}
    assert len({t.name for t in ALL_TASKS}) == len(ALL_TASKS)


def test_every_task_has_five_distinct_phrasings_and_its_answers():
    for t in ALL_TASKS:
        assert len(set(t.questions)) >= 5, t.name
        assert len(t.answers) >= 2, t.name
        assert t.region in REGION_SCALE and t.loss in ("ce", "hazard", "digits")
    questions = [q for t in TASKS for q in t.questions]
    assert len(questions) == len(set(questions)), "a phrasing may not belong to two tasks"


def test_answer_spaces_from_the_paper():
    assert get_task("nodule_size").answers == ("<=4 mm", "4-6 mm", "6-8 mm", "8-15 mm", "15-30 mm", ">30 mm")
    assert len(get_task("nodule_location").answers) == 5
    assert get_task("lung_rads").answers == ("1", "2", "3", "4") and get_task("lung_rads").scale is None
    assert get_task("lung_cancer_risk").loss == "hazard" and get_task("lung_cancer_risk").num_outputs == 7
    assert get_task("cvd_diagnosis").scale == "heart" and get_task("nodule_margin").scale == "nodule"
    assert all(t.auxiliary and t.scale is None for t in AUXILIARY_TASKS)


def test_shared_heads_agree_on_size():
    sizes = head_outputs()
    assert sizes["yes_no"] == 2 and sizes["lung_cancer_risk"] == 7 and sizes["clinical_number"] == 30
