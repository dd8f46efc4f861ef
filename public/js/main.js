/* Start the chat once the page is loaded. */
(function (ChatApp, $) {
  'use strict';

  $(function () {
    var controller = new ChatApp.MainController();
    controller.init();
    ChatApp.controller = controller; // for the browser console
  });
})(ChatApp, jQuery);
