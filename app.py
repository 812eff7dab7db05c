"""CT slice classifier: the Streamlit entry point. Declares the pages and runs
the chosen one; each page lives in ``pages/``.

    streamlit run app.py
"""
import streamlit as st

st.set_page_config(page_title="CT slice classifier", page_icon=":material/radiology:", layout="wide")

pages = [
    st.Page("pages/diagnosis.py", title="Diagnosis", icon=":material/radiology:", default=True),
    st.Page("pages/compare.py", title="Model comparison", icon=":material/compare_arrows:"),
    st.Page("pages/model_card.py", title="Model cards", icon=":material/description:"),
]
st.navigation(pages).run()
