"""Driving the demo page in headless Chromium (selenium): shared by tests/test_app.py and
bench/app.py, so that the bench times exactly what the test checks."""

import shutil


def start_browser(width=1200, height=900):
    """Debian's chromium through its chromedriver, headless; None when they are missing."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        return None
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    # Service with an explicit path: selenium's driver manager would otherwise go online.
    return webdriver.Chrome(service=Service(driver), options=options)


def open_page(browser, url, timeout=60):
    """Load the page and wait until its scripts have drawn it; -> the model summary text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)  # returns before the page's scripts have drawn it
    return WebDriverWait(browser, timeout).until(
        ec.presence_of_element_located((By.ID, "model"))).text


def read_outputs(browser):
    """-> (caption, message) as the page shows them now."""
    from selenium.webdriver.common.by import By

    caption = browser.find_element(By.CSS_SELECTOR, "#caption textarea").get_attribute("value")
    message = browser.find_element(By.ID, "message").text.strip()
    return caption, message


def clear_image(browser):
    """Remove the shown image, if any, and wait until the outputs are cleared."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    remove = browser.find_elements(By.CSS_SELECTOR, "#image button[aria-label='Remove Image']")
    if remove:
        remove[0].click()
        WebDriverWait(browser, 30).until(lambda b: not any(read_outputs(b)))


def upload(browser, path, timeout=60):
    """Upload `path` (the page's file input, as a user's drop) and wait for a caption or a
    message; -> (caption, message). Call clear_image first when an image is shown."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(path)
    WebDriverWait(browser, timeout, poll_frequency=0.02).until(lambda b: any(read_outputs(b)))
    return read_outputs(browser)
