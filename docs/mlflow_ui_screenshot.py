"""Screenshot of the MLflow runs table with chosen columns (a manual check, not a test).

    mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5055 &
    python docs/mlflow_ui_screenshot.py test.finetune.accuracy test.head.accuracy model.backbone

Needs `pip install selenium` and Chromium's chromedriver (Debian: chromium-driver). Opens the
first experiment's runs sorted by test.finetune.accuracy, ticks each named column in the
Columns menu (a name already ticked is unticked), writes docs/img/mlflow-runs.png.
"""

import contextlib
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

opts = webdriver.ChromeOptions()
for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1900,600"):
    opts.add_argument(a)
d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
d.get(
    "http://127.0.0.1:5055/#/experiments/1/runs?orderByKey=metrics.%60test.finetune.accuracy%60&orderByAsc=false"
)
time.sleep(8)
# close the assistant side panel if present
for b in d.find_elements(By.CSS_SELECTOR, "button[aria-label*='lose']"):
    with contextlib.suppress(Exception):
        b.click()
for name in sys.argv[1:]:
    btn = d.find_elements(By.XPATH, "//button[contains(., 'Columns')]")[0]
    d.execute_script("arguments[0].click();", btn)
    time.sleep(1.5)
    search = d.find_element(By.CSS_SELECTOR, "input[placeholder='Search columns']")
    search.send_keys(name)
    time.sleep(1.5)
    items = d.find_elements(By.XPATH, f"//*[normalize-space(text())='{name}']")
    print(name, len(items))
    if items:
        d.execute_script("arguments[0].click();", items[-1])
        time.sleep(1)
    d.find_element(By.TAG_NAME, "body").send_keys("\ue00c")
    time.sleep(1)
d.find_element(By.TAG_NAME, "body").send_keys("\ue00c")  # Escape
time.sleep(2)
d.save_screenshot("docs/img/mlflow-runs.png")
d.quit()
